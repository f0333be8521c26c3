"""fewstep.decoding"""
