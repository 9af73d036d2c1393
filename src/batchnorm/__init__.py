"""batchnorm"""
