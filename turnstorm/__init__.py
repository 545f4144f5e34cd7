"""turnstorm: reproduce CGNAT storms against STUN/TURN relay pools and scale out of them."""

__version__ = "0.1.0"
