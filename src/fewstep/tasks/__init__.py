"""fewstep.tasks"""
