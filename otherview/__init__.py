"""otherview: paired-prompt probes of diffusion-transformer attention heads, from a TOML spec."""

__version__ = "0.1.0"
