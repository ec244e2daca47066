"""Objectives and estimators shared by the zoo's models."""
