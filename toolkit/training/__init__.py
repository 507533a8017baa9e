"""Fine-tuning with torch: image folders, the torchvision models, the training loop, and checkpoints."""
