"""Prompts and reference answers: dataset files, prompt templates, the synthetic arithmetic task."""
