"""Experiment configs: ``base_*.py`` per detector family, thin files per experiment."""
