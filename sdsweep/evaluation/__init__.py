"""Evaluation of a pipeline: sampling the eval prompts (generation), the metrics (metrics), the evaluator that
scores a trial (evaluate), the held-out-caption protocol, the shapes judge, and human ratings.
"""
