"""The data a run reads: the input spec (image size, classes, normalization: ``inputs``), datasets read from an
ImageFolder or CIFAR-10 folder, decoded once into a cache, split into train and val, and held on the device for
training (``datasets``), or streamed from a memory-mapped cache when they do not fit (``stream``)."""
