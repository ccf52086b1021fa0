"""The seed's CIFAR-10 example: ResNet-9 models trained on random halves of CIFAR-10's training
set, each reporting its correct-class margins on the 10,000 test images (see README.md)."""
