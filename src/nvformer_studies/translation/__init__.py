"""Translation across domains (a Marian model trained here on koran)."""
