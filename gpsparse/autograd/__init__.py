"""autograd"""
