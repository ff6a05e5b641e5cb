"""Explanations of adaptive decisions: ``views`` draws traces (no model calls); ``attribution`` runs Captum
on demand (model calls)."""
