"""fewstep.eval"""
