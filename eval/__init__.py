"""Verification (insightface `.bin` packs, 10-fold accuracy), pack building and export."""
