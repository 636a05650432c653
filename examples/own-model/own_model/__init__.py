"""An own-model project for fedsafe: a small GroupNorm ResNet on MNIST digits."""
