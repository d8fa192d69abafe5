"""pix2pixHD networks and losses, compatible with official checkpoints."""
from .checkpoint import CheckpointMismatchError, load_network, read_state_dict
from .discriminator import MultiscaleDiscriminator, NLayerDiscriminator
from .encoder import Encoder
from .generator import GlobalGenerator, LocalEnhancer, ResnetBlock
from .layers import init_weights
from .losses import GANLoss, VGGLoss, feature_matching_loss
from .vgg import VGG19_WEIGHTS_ENV, VGGWeightsNotFound, Vgg19

__all__ = [
    "CheckpointMismatchError",
    "Encoder",
    "GANLoss",
    "GlobalGenerator",
    "LocalEnhancer",
    "MultiscaleDiscriminator",
    "NLayerDiscriminator",
    "ResnetBlock",
    "VGG19_WEIGHTS_ENV",
    "VGGLoss",
    "VGGWeightsNotFound",
    "Vgg19",
    "feature_matching_loss",
    "init_weights",
    "load_network",
    "read_state_dict",
]
