DROP TABLE commands;
DROP TABLE agents;
