"""CIFAR-10: the 10 classes in label order.
"""

CLASSNAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
