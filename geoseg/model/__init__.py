"""geoseg's land-cover network, its model card and the checkpoint format that carries both."""

from geoseg.model.card import ClassInfo, ModelCard
from geoseg.model.checkpoint import SHIPPED, load_card, load_model, save_checkpoint
from geoseg.model.unet import UNet, build_unet

__all__ = ["SHIPPED", "ClassInfo", "ModelCard", "UNet", "build_unet", "load_card", "load_model", "save_checkpoint"]
