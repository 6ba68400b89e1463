"""Evaluation: detections back to image coordinates, COCO results and COCOeval metrics."""
