"""Data shipped with linmix: example images for the demos (:mod:`linmix.data.examples`)."""
