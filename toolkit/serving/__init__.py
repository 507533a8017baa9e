"""The torch-free serving side: sessions (one opener per engine), the Classifier, `rtk serve`, Triton
repositories, batch prediction, and bundle signatures. Imports nothing from training, export or evaluation."""
