"""The fine-tuning loop every training pass shares: its settings, augmentation, the budget guard and the label-free objectives."""
