"""Where objects live: the Backend contract, the file and S3 stores, wrappers, the URL table."""
