"""Training support shared by methods that train (QAT data: :mod:`qexport.training.qat_data`)."""
