"""rtk: fine-tune, export, verify, benchmark and serve torchvision ResNet classifiers."""

__version__ = "0.1.0"
