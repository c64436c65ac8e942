"""Oxford-IIIT Pets: the 37 breeds in class-id order (the dataset's spelling with underscores as spaces;
cat breeds are capitalised there, dog breeds are not).
"""

CLASSNAMES = [
    "Abyssinian", "american bulldog", "american pit bull terrier", "basset hound", "beagle", "Bengal",
    "Birman", "Bombay", "boxer", "British Shorthair", "chihuahua", "Egyptian Mau", "english cocker spaniel",
    "english setter", "german shorthaired", "great pyrenees", "havanese", "japanese chin", "keeshond",
    "leonberger", "Maine Coon", "miniature pinscher", "newfoundland", "Persian", "pomeranian", "pug",
    "Ragdoll", "Russian Blue", "saint bernard", "samoyed", "scottish terrier", "shiba inu", "Siamese",
    "Sphynx", "staffordshire bull terrier", "wheaten terrier", "yorkshire terrier",
]
