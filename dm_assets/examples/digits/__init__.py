"""Datamodels on real data: scikit-learn's bundled handwritten digits (1,797 8x8 images).

A fixed split (:func:`~dm_assets.examples.digits.data.load_split`) puts 1,000 images in the
training set the masks range over and the other 797 among the targets; each model is a small
torch classifier trained on half of the 1,000 (:mod:`~dm_assets.examples.digits.train_digits`)
and outputs its correct-class margin on every target.
"""
