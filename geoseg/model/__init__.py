"""geoseg's land-cover network (unet), its model card (card) and the checkpoint format that carries both (checkpoint).

Empty on purpose: the card is numpy-only, and tile-reading workers that import it must not pay for torch.
"""
