"""The AI side of Hilum: model plug-ins, the reference models, pixel reading and the DICOM SEG
and SR (TID 1500) writers; jobs and the worker that runs them."""
