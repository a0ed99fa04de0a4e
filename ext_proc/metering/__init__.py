"""What a response costs: API shapes, one meter per shape, decoding, prices, anomalies."""
