"""Preprocessing: videos and labeled corpora -> WebDataset shards of text, wav2vec2 and DenseNet-FER+ features."""
