"""The one data pipeline every method shares: samples -> records -> tokenised examples -> batches."""
