"""Engines run token rows; they know nothing about HTTP or about which strategy asked."""
