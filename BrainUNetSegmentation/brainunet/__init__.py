"""BrainUNet core: glioma segmentation (ET, NETC, SNFH) on T1CE, T2W and FLAIR MRI.

Pure Python: no Qt, no Slicer application. torch is imported only where a network runs.
"""
__version__ = "0.1.0"
