"""Mixture search: mixtures drawn around a base, proxy runs trained and evaluated on them, fits of their losses, and
the proposal that the fits predict best under the real run's constraints."""
