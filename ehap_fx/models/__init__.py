"""Pretrained-compatible CIFAR models of the EHAP paper."""
