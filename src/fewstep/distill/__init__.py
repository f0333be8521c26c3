"""fewstep.distill"""
