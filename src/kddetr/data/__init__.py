"""COCO-format data: dataset, transforms, collation, the embedded dataset."""
