"""MEmoBERT pretraining: the cross-modal model, masking, the four tasks, the loader and the DeepSpeed loop."""
