"""Trainer classes: thin ``nnUNetTrainer`` subclasses that wire our pure functions into nnU-Net.

Every ``nnUNetTrainer*`` class defined at module level in a submodule of this package is found by stock
``nnUNetv2_train -tr NAME`` / ``nnUNetv2_predict -tr NAME`` (see ``nnunetv2_ohem/_discovery.py``).
"""
