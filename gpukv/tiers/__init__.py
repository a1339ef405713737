"""Tiers below L1: a safetensors disk tier, a Redis/Valkey tier shared by many machines, and the
self-describing value format both use."""
