"""Networks and losses for the chest-radiograph VAE-GAN."""

from networks.vaegan import VAEGAN, Decoder, Discriminator, Encoder, Generator, ModelConfig

__all__ = ["VAEGAN", "Decoder", "Discriminator", "Encoder", "Generator", "ModelConfig"]
