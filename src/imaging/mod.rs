//! Imaging: volume I/O, PSF models, synthetic training data, Richardson–Lucy
//! deconvolution, image-quality metrics.
