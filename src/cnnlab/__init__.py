"""cnnlab: design, train, understand and benchmark compact CNN image classifiers."""

__version__ = "0.1.0"
