"""data/corruptions"""
