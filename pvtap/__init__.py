"""pvtap: a transparent logging proxy for home-energy devices and their vendor clouds."""

__version__ = "0.1.0"
