"""segmentation_io"""
