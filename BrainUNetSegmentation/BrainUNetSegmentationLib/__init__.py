"""The Slicer bridge of BrainUNet (Slicer's ``<Module>Lib`` convention): MRML conversion, the background
run of the ``brainunet`` worker, and the module's self-test scenarios. It imports the runtime
(``brainunet``) and MRML, never the lab, and no Qt: the widget in ``BrainUNetSegmentation.py`` holds that."""
