"""The torch-free runtime a service imports: `from toolkit.runtime import Classifier`.

A stable name for users; the code lives in `toolkit.serving.classifier`.
"""

from toolkit.serving.classifier import Classifier, Prediction, softmax  # noqa: F401  (re-exported)
