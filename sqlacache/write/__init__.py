"""The write path: flush → tracker → commit → bump → fan-out. Imports nothing from the read path."""
