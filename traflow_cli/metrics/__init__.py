"""Metrics: toy distances, teacher-student agreement, FID."""
